"""Drives headless Chromium (Debian's chromium + chromium-driver) through the dashboard.

usage: browser.py BASE_URL USER PASSWORD OUT_DIR

Prints one JSON object of what the browser saw; OUT_DIR gets screenshots of each page.
"""
import json
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

base, user, password, out = sys.argv[1:5]
opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--disable-background-networking", "--window-size=1280,1600"):
    opts.add_argument(a)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
driver.set_page_load_timeout(30)
wait = WebDriverWait(driver, 20)
seen = {}
try:
    # A report link, as an email carries it, first shows the login form.
    driver.get(base + "/studies/1/report?run=1")
    wait.until(ec.presence_of_element_located((By.ID, "password")))
    seen["login_url"] = driver.current_url
    driver.save_screenshot(out + "/login.png")
    driver.find_element(By.ID, "username").send_keys(user)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login").click()
    # ... and after it, the report itself.
    wait.until(lambda d: "/report" in d.current_url and d.find_elements(By.TAG_NAME, "img"))
    seen["after_login_url"] = driver.current_url
    seen["report_title"] = driver.title
    imgs = driver.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);")
    seen["report_images"] = len(imgs)
    seen["report_images_drawn"] = sum(1 for c, w, h in imgs if c and w > 0 and h > 0)
    driver.save_screenshot(out + "/report.png")

    driver.get(base + "/studies")
    wait.until(ec.presence_of_element_located((By.ID, "studies")))
    seen["studies_rows"] = [
        [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in driver.find_elements(By.CSS_SELECTOR, "#studies tbody tr")
    ]
    # The stylesheet applied: the header bar is coloured.
    seen["header_background"] = driver.execute_script(
        "return getComputedStyle(document.querySelector('header')).backgroundColor;")
    driver.save_screenshot(out + "/studies.png")
    driver.find_element(By.LINK_TEXT, "Study 1").click()
    wait.until(ec.presence_of_element_located((By.ID, "runs")))
    seen["study_heading"] = driver.find_element(By.TAG_NAME, "h1").text
    seen["lesion_rows"] = len(driver.find_elements(By.CSS_SELECTOR, "#lesions tbody tr"))
    seen["rerun_form"] = len(driver.find_elements(By.ID, "rerun"))
    driver.save_screenshot(out + "/study.png")

    driver.find_element(By.CSS_SELECTOR, "nav button[type=submit]").click()
    wait.until(ec.presence_of_element_located((By.ID, "password")))
    seen["after_logout_url"] = driver.current_url
    driver.get(base + "/studies")
    wait.until(ec.presence_of_element_located((By.ID, "password")))
    seen["studies_after_logout_url"] = driver.current_url
    seen["cookies_js_visible"] = driver.execute_script("return document.cookie;")
finally:
    driver.quit()
print(json.dumps(seen))
